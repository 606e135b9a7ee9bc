//! Load balancing through a real 3-node cluster (`portcullis up`), with extra demo-app
//! backends registered through `portcullis cvm register` and curl as the client.
//!
//! Clients "from elsewhere" are presented with the PROXY protocol: each test client is a
//! small local relay that prepends a PROXY v1 header naming a public address, and `up` is
//! told (hidden `--proxy-protocol-from 127.0.0.1`) to trust it. Every wait polls a condition
//! with a deadline.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::harness::{
    free_port, phase, portcullis_bin, show, wait_for, TestCluster,
};

struct Lb {
    tc: TestCluster,
    base: String,
    backends: HashMap<String, (Child, u16)>,
    relays: HashMap<(u64, String), u16>,
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.tc.down();
        for (c, _) in self.backends.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Copies one direction until either side closes.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// A local port whose connections reach `gateway` as if they came from `client_ip`.
fn proxy_relay(gateway: String, client_ip: String) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            let Ok(mut g) = TcpStream::connect(&gateway) else {
                continue;
            };
            let dport = gateway.rsplit(':').next().unwrap_or("443").to_string();
            let hdr = format!("PROXY TCP4 {client_ip} 127.0.0.1 40000 {dport}\r\n");
            if g.write_all(hdr.as_bytes()).is_err() {
                continue;
            }
            let (Ok(c2), Ok(g2)) = (c.try_clone(), g.try_clone()) else {
                continue;
            };
            std::thread::spawn(move || pipe(c, g));
            std::thread::spawn(move || pipe(g2, c2));
        }
    });
    port
}

impl Lb {
    fn up() -> Lb {
        let tc = TestCluster::up_with(3, &["--proxy-protocol-from", "127.0.0.1"]);
        let text = std::fs::read_to_string(tc.path().join("cluster.json")).expect("cluster.json");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let base = v["base_domain"].as_str().expect("base_domain").to_string();
        Lb {
            tc,
            base,
            backends: HashMap::new(),
            relays: HashMap::new(),
        }
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.tc.cli(args);
        assert!(out.status.success(), "portcullis {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Starts a demo-app for `id` on `port` (a fresh one unless restarting).
    fn start_backend(&mut self, id: &str, app: &str, region: &str, port: Option<u16>) -> u16 {
        let port = port.unwrap_or_else(free_port);
        let child = Command::new(portcullis_bin())
            .args(["demo-app", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--name", app, "--region", region, "--instance-id", id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start demo-app");
        wait_for(
            &format!("demo-app {id} listening"),
            Duration::from_secs(10),
            || TcpStream::connect(("127.0.0.1", port)).ok(),
        );
        self.backends.insert(id.to_string(), (child, port));
        port
    }

    fn add_instance(&mut self, id: &str, app: &str, region: &str) {
        let port = self.start_backend(id, app, region, None);
        self.cli_ok(&[
            "cvm",
            "register",
            "--instance-id",
            id,
            "--app",
            app,
            "--region",
            region,
            "--backend",
            &format!("127.0.0.1:{port}"),
        ]);
    }

    fn stop_backend(&mut self, id: &str) -> u16 {
        let (mut c, port) = self.backends.remove(id).expect("backend");
        c.kill().expect("kill demo-app");
        let _ = c.wait();
        port
    }

    fn https_addr(&self, node: u64) -> String {
        self.tc.node(node).https_addr.clone()
    }

    /// GET https://<app>.<base>/ through `node`, as `client` (via a PROXY relay) or as
    /// 127.0.0.1. Returns (status, instance id or body).
    fn get(&mut self, node: u64, app: &str, client: Option<&str>) -> (u16, String) {
        let port = match client {
            Some(ip) => {
                let key = (node, ip.to_string());
                let gw = self.https_addr(node);
                *self
                    .relays
                    .entry(key)
                    .or_insert_with(|| proxy_relay(gw, ip.to_string()))
            }
            None => self
                .https_addr(node)
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port"),
        };
        let host = format!("{app}.{}", self.base);
        let out: Output = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(self.tc.path().join("pki/dev-ca.pem"))
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg(format!("https://{host}:{port}/"))
            .stdin(Stdio::null())
            .output()
            .expect("curl");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
        let status = code.trim().parse().unwrap_or(0);
        if status != 200 {
            return (
                status,
                format!("{body} {}", String::from_utf8_lossy(&out.stderr)),
            );
        }
        let v: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("not json ({e}): {body}"));
        (
            status,
            v["instance_id"].as_str().expect("instance_id").to_string(),
        )
    }

    fn instance(&mut self, node: u64, app: &str, client: Option<&str>) -> String {
        let (status, who) = self.get(node, app, client);
        assert_eq!(
            status, 200,
            "GET {app} via node {node} as {client:?}: {who}"
        );
        who
    }

    /// Waits until every gateway serves `app` from exactly `ids` (as 127.0.0.1, which is
    /// spread by round robin or simply reaches one of them).
    fn wait_registered(&mut self, app: &str, n: usize) {
        for node in self.tc.ids() {
            wait_for(
                &format!("node {node} routes {app} to {n} instances"),
                Duration::from_secs(15),
                || {
                    let out = self.tc.cli_at(node, &["cvm", "list", "--json"]);
                    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                    let count = v
                        .as_array()?
                        .iter()
                        .filter(|i| i["app"].as_str() == Some(app))
                        .count();
                    (count == n).then_some(())
                },
            );
        }
    }

    fn metrics(&self, node: u64) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .arg(format!("http://{}/metrics", self.tc.node(node).admin_addr))
            .output()
            .expect("curl metrics");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn healthy_metric(&self, node: u64, id: &str) -> Option<i64> {
        let prefix = format!("portcullis_edge_backend_healthy{{instance=\"{id}\"}} ");
        self.metrics(node)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }
}

/// Public addresses on several continents (bundled DB-IP country database).
const CLIENTS: [&str; 10] = [
    "8.8.8.8",
    "193.0.6.139",
    "14.139.1.1",
    "49.44.1.1",
    "81.2.69.142",
    "103.21.244.1",
    "2.16.0.1",
    "8.8.4.4",
    "1.0.16.1",
    "45.60.1.1",
];

#[test]
fn t85_hash_ip_affinity_across_gateways_and_removal() {
    let mut lb = Lb::up();
    phase("app aff --lb hash:ip with 4 instances");
    lb.cli_ok(&["app", "create", "aff", "--port", "8080", "--lb", "hash:ip"]);
    // Every policy form is accepted through the CLI; a bad one is refused with the value.
    for (i, policy) in [
        "round-robin",
        "least-conn",
        "hash:header=x-user",
        "hash:cookie=sid",
        "geo",
        "geo+least-conn",
        "geo+hash:cookie=sid",
    ]
    .iter()
    .enumerate()
    {
        lb.cli_ok(&[
            "app",
            "create",
            &format!("p{i}"),
            "--port",
            "80",
            "--lb",
            policy,
        ]);
    }
    let out = lb
        .tc
        .cli(&["app", "create", "bad", "--port", "80", "--lb", "hash:body"]);
    assert!(!out.status.success(), "hash:body accepted");
    assert!(show(&out).contains("hash:body"), "{}", show(&out));
    for i in 1..=4 {
        lb.add_instance(&format!("aff-{i}"), "aff", "us-east");
    }
    lb.wait_registered("aff", 4);

    phase("every gateway maps each client to the same instance");
    let mut chosen: HashMap<&str, String> = HashMap::new();
    for c in CLIENTS {
        let first = lb.instance(1, "aff", Some(c));
        for node in [1, 2, 3] {
            for _ in 0..2 {
                assert_eq!(
                    lb.instance(node, "aff", Some(c)),
                    first,
                    "client {c} via node {node}"
                );
            }
        }
        chosen.insert(c, first);
    }
    let distinct: std::collections::HashSet<&String> = chosen.values().collect();
    eprintln!("affinity map: {chosen:?}");
    assert!(
        distinct.len() >= 2,
        "10 clients all hashed to one instance: {chosen:?}"
    );

    phase("remove an instance; the others' clients keep theirs");
    let victim = chosen.values().next().expect("one").clone();
    lb.cli_ok(&["cvm", "remove", &victim]);
    lb.wait_registered("aff", 3);
    for node in [1, 2, 3] {
        for c in CLIENTS {
            let now = lb.instance(node, "aff", Some(c));
            assert_ne!(now, victim, "removed instance still served");
            if chosen[c] != victim {
                assert_eq!(now, chosen[c], "client {c} moved via node {node}");
            }
        }
    }
}

#[test]
fn t86_geo_nearest_region_then_next() {
    let mut lb = Lb::up();
    phase("app geo --lb geo with one instance per region");
    lb.cli_ok(&["app", "create", "geoapp", "--port", "8080", "--lb", "geo"]);
    for region in ["us-east", "eu-west", "ap-south"] {
        lb.add_instance(&format!("g-{region}"), "geoapp", region);
    }
    lb.wait_registered("geoapp", 3);

    // US → us-east, Netherlands/UK → eu-west, India → ap-south; through every gateway.
    let expect = [
        ("8.8.8.8", "g-us-east"),
        ("193.0.6.139", "g-eu-west"),
        ("81.2.69.142", "g-eu-west"),
        ("14.139.1.1", "g-ap-south"),
    ];
    phase("clients land in the nearest region");
    for node in [1, 2, 3] {
        for (c, want) in expect {
            assert_eq!(
                lb.instance(node, "geoapp", Some(c)),
                want,
                "{c} via node {node}"
            );
        }
    }

    phase("stop ap-south's instance: India fails over to eu-west (next nearest)");
    lb.stop_backend("g-ap-south");
    let start = Instant::now();
    for node in [1, 2, 3] {
        // No failure even before health checks notice: the GET is retried on the next region.
        for _ in 0..3 {
            assert_eq!(
                lb.instance(node, "geoapp", Some("14.139.1.1")),
                "g-eu-west",
                "India via node {node} after ap-south stopped"
            );
        }
        assert_eq!(lb.instance(node, "geoapp", Some("8.8.8.8")), "g-us-east");
    }
    eprintln!("failover checked in {:?}", start.elapsed());

    phase("stop eu-west's too: Europe and India go to us-east");
    lb.stop_backend("g-eu-west");
    for node in [1, 2, 3] {
        assert_eq!(lb.instance(node, "geoapp", Some("14.139.1.1")), "g-us-east");
        assert_eq!(
            lb.instance(node, "geoapp", Some("193.0.6.139")),
            "g-us-east"
        );
    }

    phase("nothing healthy: a clear 503");
    lb.stop_backend("g-us-east");
    for node in [1, 2, 3] {
        let (status, body) = wait_for("503 once all are down", Duration::from_secs(10), || {
            let r = lb.get(node, "geoapp", Some("8.8.8.8"));
            (r.0 == 503).then_some(r)
        });
        assert_eq!(status, 503);
        assert!(body.contains("no healthy instance"), "503 body: {body}");
    }
}

#[test]
fn t87_health_fall_and_rise_without_failed_requests() {
    let mut lb = Lb::up();
    phase("app hl --lb round-robin with 2 instances");
    lb.cli_ok(&["app", "create", "hl", "--port", "8080"]);
    lb.add_instance("hl-1", "hl", "us-east");
    lb.add_instance("hl-2", "hl", "us-east");
    lb.wait_registered("hl", 2);
    for node in [1, 2, 3] {
        let seen: std::collections::HashSet<String> =
            (0..4).map(|_| lb.instance(node, "hl", None)).collect();
        assert_eq!(seen.len(), 2, "round robin via node {node}: {seen:?}");
        wait_for("health metric 1", Duration::from_secs(10), || {
            (lb.healthy_metric(node, "hl-1") == Some(1)).then_some(())
        });
    }

    phase("kill hl-1: every request still succeeds, and it leaves rotation");
    let port = lb.stop_backend("hl-1");
    let killed = Instant::now();
    let mut requests = 0;
    let mut ejected: HashMap<u64, Duration> = HashMap::new();
    while ejected.len() < 3 {
        for node in [1, 2, 3] {
            let (status, who) = lb.get(node, "hl", None);
            requests += 1;
            assert_eq!(
                status, 200,
                "request {requests} via node {node} failed: {who}"
            );
            assert_eq!(who, "hl-2");
            if !ejected.contains_key(&node) && lb.healthy_metric(node, "hl-1") == Some(0) {
                ejected.insert(node, killed.elapsed());
            }
        }
        // Default fall 3 × interval 500 ms + timeout: well under 10 s.
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "hl-1 not ejected everywhere: {ejected:?}"
        );
    }
    eprintln!("ejected after {ejected:?}; {requests} requests, none failed");

    phase("restart hl-1 on its port: back in rotation after rise");
    lb.start_backend("hl-1", "hl", "us-east", Some(port));
    let restarted = Instant::now();
    for node in [1, 2, 3] {
        wait_for(
            &format!("node {node} serves hl-1 again"),
            Duration::from_secs(10),
            || {
                (0..4)
                    .any(|_| lb.instance(node, "hl", None) == "hl-1")
                    .then_some(())
            },
        );
    }
    eprintln!("back in rotation after {:?}", restarted.elapsed());
}

#[test]
fn t88_weighted_round_robin_and_drain() {
    let mut lb = Lb::up();
    phase("app wt --lb round-robin with 2 instances, weights 3 and 1");
    lb.cli_ok(&["app", "create", "wt", "--port", "8080"]);
    lb.add_instance("wt-1", "wt", "us-east");
    lb.add_instance("wt-2", "wt", "us-east");
    lb.wait_registered("wt", 2);
    lb.cli_ok(&["cvm", "weight", "wt-1", "3"]);
    let shown: serde_json::Value =
        serde_json::from_str(&lb.cli_ok(&["--json", "cvm", "show", "wt-1"])).expect("json");
    assert_eq!(shown["weight"], 3, "{shown}");

    // Every node applies the weight; count a full cycle's worth of picks through each.
    for node in [1, 2, 3] {
        wait_for(
            &format!("node {node} splits 3:1"),
            Duration::from_secs(10),
            || {
                let mut n: HashMap<String, u32> = HashMap::new();
                for _ in 0..16 {
                    *n.entry(lb.instance(node, "wt", None)).or_default() += 1;
                }
                let (a, b) = (n.get("wt-1").copied()?, n.get("wt-2").copied()?);
                (a == 12 && b == 4).then_some(())
            },
        );
    }

    phase("weight 0 drains wt-1: every request goes to wt-2");
    lb.cli_ok(&["cvm", "weight", "wt-1", "0"]);
    for node in [1, 2, 3] {
        wait_for(
            &format!("node {node} drained wt-1"),
            Duration::from_secs(10),
            || {
                (0..8)
                    .all(|_| lb.instance(node, "wt", None) == "wt-2")
                    .then_some(())
            },
        );
    }

    phase("an out-of-range weight and an unknown instance are refused");
    for args in [
        ["cvm", "weight", "wt-1", "10001"],
        ["cvm", "weight", "nope", "2"],
    ] {
        let out = lb.tc.cli(&args);
        assert!(!out.status.success(), "{args:?} accepted: {}", show(&out));
    }
}
