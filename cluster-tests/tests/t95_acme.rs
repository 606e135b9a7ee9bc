//! Automatic certificates against the real Pebble CA (issue 6), through a 3-node cluster.
//!
//! - The test creates Pebble's own HTTPS certificate, starts `pebble-challtestsrv` (DNS: every
//!   name resolves to 127.0.0.1) and, once it knows which node holds the orderer lease, `pebble`
//!   with `httpPort` set to ANOTHER node's HTTP port: the CA's HTTP-01 validation request can only
//!   be answered from the replicated challenge table.
//! - The issued certificate must be served by all three nodes and verify (curl) against Pebble's
//!   root, fetched from Pebble's management endpoint.
//! - `portcullis cert renew` replaces it with a new certificate, served everywhere.
//! - The orderer is SIGKILLed mid-order; another node takes the lease (higher fencing token) and
//!   finishes: exactly one certificate for the name.
//!
//! Skips (with a printed reason) when Pebble or curl is not installed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis_cluster_tests::harness::{
    free_port, phase, portcullis_bin, run, show, wait_for, TestCluster,
};

const NAME: &str = "www.shop.test";
const SECOND: &str = "api.shop.test";
/// Resolves to 127.0.0.2, where no node listens: its validation fails, again and again.
const BAD: &str = "bad.shop.test";
/// Pebble's certificate lifetime in this test: short enough that automatic renewal (at a third
/// of the lifetime left) happens during the test.
const LIFETIME_SECS: u64 = 45;

fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Pebble, its challenge test server, and the cluster; all stopped on drop.
struct Env {
    tc: TestCluster,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    pebble_port: u16,
    pebble_mgmt: u16,
    dns_port: u16,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new(portcullis_bin())
            .args(["down", "--state-dir"])
            .arg(self.tc.path())
            .output();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA and a `localhost`/127.0.0.1 leaf for Pebble's HTTPS listeners. Returns the CA path.
fn pebble_tls(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "t95 pebble https ca");
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("leaf params")
        .signed_by(&key, &issuer)
        .expect("leaf cert");
    std::fs::write(dir.join("pebble-https-ca.pem"), ca_cert.pem()).expect("write");
    std::fs::write(dir.join("pebble-https.pem"), leaf.pem()).expect("write");
    std::fs::write(dir.join("pebble-https.key"), key.serialize_pem()).expect("write");
    dir.join("pebble-https-ca.pem")
}

impl Env {
    fn start() -> Option<Env> {
        for bin in ["pebble", "pebble-challtestsrv", "curl"] {
            if !installed(bin) {
                eprintln!(
                    "SKIP t95_acme: `{bin}` is not installed (Debian: apt-get install pebble curl)"
                );
                return None;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("t95-pebble-")
            .tempdir()
            .expect("tempdir");
        let ca = pebble_tls(dir.path());
        let dns_port = free_port();
        let challtest_mgmt = free_port();

        phase("start pebble-challtestsrv (DNS: every name is 127.0.0.1)");
        let log = std::fs::File::create(dir.path().join("challtestsrv.log")).expect("log");
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args([
                "-management",
                &format!("127.0.0.1:{challtest_mgmt}"),
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble-challtestsrv");

        phase("start a 3-node cluster and enable [acme] on every node (rolling restart)");
        let tc = TestCluster::up(3);
        let mut env = Env {
            tc,
            dir,
            children: vec![challtestsrv],
            pebble_port: free_port(),
            pebble_mgmt: free_port(),
            dns_port,
        };
        let directory = format!("https://127.0.0.1:{}/dir", env.pebble_port);
        for id in env.tc.ids() {
            let path = env.tc.node(id).config.clone();
            let text = std::fs::read_to_string(&path).expect("read config");
            let mut cfg: toml::Table = toml::from_str(&text).expect("parse config");
            let mut acme = toml::Table::new();
            acme.insert("enabled".into(), true.into());
            acme.insert("directory".into(), directory.clone().into());
            acme.insert("extra_root".into(), ca.display().to_string().into());
            acme.insert(
                "domains".into(),
                toml::Value::Array(vec![NAME.into(), SECOND.into(), BAD.into()]),
            );
            acme.insert("include_base_domains".into(), false.into());
            acme.insert("lease_secs".into(), 6.into());
            acme.insert("retry_max_secs".into(), 2.into());
            acme.insert("check_interval_secs".into(), 2.into());
            acme.insert("request_timeout_secs".into(), 30.into());
            cfg.insert("acme".into(), acme.into());
            std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write config");
            let t = std::time::Instant::now();
            env.tc.stop(id);
            env.tc.start_node(id);
            eprintln!("restarted node {id} in {:.1}s", t.elapsed().as_secs_f64());
        }
        // The failing name: an A record nobody answers on.
        let out = run(Command::new("curl")
            .args(["-sS", "--max-time", "5", "-X", "POST", "-d"])
            .arg(format!(r#"{{"host":"{BAD}","addresses":["127.0.0.2"]}}"#))
            .arg(format!("http://127.0.0.1:{challtest_mgmt}/add-a")));
        assert!(out.status.success(), "challtestsrv add-a: {}", show(&out));
        Some(env)
    }

    fn metric(&self, id: u64, name: &str) -> Option<i64> {
        let out = run(Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}/metrics", self.tc.node(id).admin_addr),
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    fn holder(&self, among: &[u64]) -> Option<u64> {
        let held: Vec<u64> = among
            .iter()
            .copied()
            .filter(|id| self.metric(*id, "portcullis_acme_lease_held") == Some(1))
            .collect();
        (held.len() == 1).then(|| held[0])
    }

    fn start_pebble(&mut self, http_port: u16) {
        let cfg = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.pebble_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.pebble_mgmt),
                "certificate": self.dir.path().join("pebble-https.pem"),
                "privateKey": self.dir.path().join("pebble-https.key"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "certificateValidityPeriod": LIFETIME_SECS,
                "externalAccountBindingRequired": false
            }
        });
        let path = self.dir.path().join("pebble.json");
        std::fs::write(&path, cfg.to_string()).expect("write pebble config");
        let log = std::fs::File::create(self.dir.path().join("pebble.log")).expect("log");
        let child = Command::new("pebble")
            .arg("-config")
            .arg(&path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            // No random validation delay, no deliberate nonce rejections: the test measures
            // the cluster, not Pebble's chaos switches.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            // Every order needs a fresh validation, so the orderer crash lands mid-order.
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble");
        self.children.push(child);
        let ca = self.dir.path().join("pebble-https-ca.pem");
        let url = format!("https://127.0.0.1:{}/dir", self.pebble_port);
        wait_for("pebble's directory", Duration::from_secs(20), || {
            let out = run(Command::new("curl")
                .args(["-sS", "--max-time", "2", "--cacert"])
                .arg(&ca)
                .arg(&url));
            out.status.success().then_some(())
        });
    }

    /// Pebble's issuing root (changes every Pebble start), from its management endpoint.
    fn pebble_root(&self) -> PathBuf {
        let out = run(Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(self.dir.path().join("pebble-https-ca.pem"))
            .arg(format!("https://127.0.0.1:{}/roots/0", self.pebble_mgmt)));
        assert!(out.status.success(), "fetch pebble root: {}", show(&out));
        let path = self.dir.path().join("pebble-root.pem");
        std::fs::write(&path, &out.stdout).expect("write root");
        path
    }

    fn pebble_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    /// `cert list --json` entries for `name`, from node `id`.
    fn certs_named(&self, id: u64, name: &str) -> Option<Vec<serde_json::Value>> {
        let out = self.tc.cli_at(id, &["cert", "list", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            v.into_iter()
                .filter(|c| c["name"].as_str() == Some(name))
                .collect(),
        )
    }

    /// The serial of the certificate node `id` serves for `name`, if curl verifies it against
    /// `root`.
    fn served_serial(&self, id: u64, name: &str, root: &Path) -> Option<String> {
        let https = &self.tc.node(id).https_addr;
        let port = https.rsplit_once(':').map(|(_, p)| p).unwrap_or("443");
        let out = run(Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{certs}",
            ])
            .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
            .arg("--cacert")
            .arg(root)
            .arg(format!("https://{name}:{port}/")));
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // curl >= 7.88 prints the chain with `-w %{certs}`; older versions print nothing, in
        // which case a verified handshake is all we can assert.
        let serial = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Serial Number:")
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "verified".into());
        Some(serial)
    }
}

#[test]
fn acme_http01_through_a_non_orderer_node_renewal_and_orderer_crash() {
    let Some(mut env) = Env::start() else {
        return;
    };
    let ids = env.tc.ids();

    phase("wait for exactly one orderer lease holder");
    let holder = wait_for("one lease holder", Duration::from_secs(30), || {
        env.holder(&ids)
    });
    let other = *ids.iter().find(|id| **id != holder).expect("another node");
    let other_http: u16 = env
        .tc
        .node(other)
        .http_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("http port");
    eprintln!(
        "orderer is node {holder}; Pebble validates through node {other} (port {other_http})"
    );

    phase("start pebble: HTTP-01 validation goes to the non-orderer node");
    env.start_pebble(other_http);
    let started = std::time::Instant::now();

    phase("wait for the certificate in the replicated state");
    let cert = wait_for("ACME certificate stored", Duration::from_secs(120), || {
        env.certs_named(holder, NAME)?.into_iter().next()
    });
    eprintln!(
        "issued {NAME} in {:.1}s (from Pebble start, including backoff): {cert}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cert["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "issuer {cert}"
    );
    assert!(
        env.tc
            .node_log(other)
            .contains("answered ACME http-01 challenge"),
        "node {other} should have answered the CA's validation request"
    );
    assert!(
        !env.tc
            .node_log(holder)
            .contains("answered ACME http-01 challenge"),
        "the orderer itself must not have been asked"
    );

    phase("curl verifies the certificate on all three nodes against Pebble's root");
    let root = env.pebble_root();
    let mut serials = Vec::new();
    for id in &ids {
        let s = wait_for(
            &format!("node {id} serves {NAME} verified by Pebble's root"),
            Duration::from_secs(20),
            || env.served_serial(*id, NAME, &root),
        );
        serials.push(s);
    }
    assert!(
        serials.windows(2).all(|w| w[0] == w[1]),
        "all nodes serve the same certificate: {serials:?}"
    );
    let first_serial = serials[0].clone();
    eprintln!("all nodes serve serial {first_serial}");

    phase("`portcullis cert renew` replaces the certificate everywhere");
    let out = env.tc.cli(&["cert", "renew", NAME]);
    assert!(out.status.success(), "cert renew: {}", show(&out));
    let out = env.tc.cli(&["cert", "renew", "nope.shop.test"]);
    assert!(
        !out.status.success(),
        "renewing an unknown certificate must fail"
    );
    let not_after = cert["not_after"].as_u64().unwrap_or(0);
    let renewed = wait_for(
        "renewed certificate stored",
        Duration::from_secs(120),
        || {
            let c = env.certs_named(holder, NAME)?.into_iter().next()?;
            // A renewed certificate from Pebble has a later expiry (issued later, same lifetime).
            (c["not_after"].as_u64()? > not_after).then_some(c)
        },
    );
    eprintln!("renewed: {renewed}");
    let mut renewed_serial = first_serial.clone();
    if first_serial != "verified" {
        for id in &ids {
            renewed_serial = wait_for(
                &format!("node {id} serves the renewed certificate"),
                Duration::from_secs(20),
                || {
                    env.served_serial(*id, NAME, &root)
                        .filter(|s| *s != first_serial)
                },
            );
        }
    }

    eprintln!("all nodes serve renewed serial {renewed_serial}");

    phase("a name whose validation fails is reported and retried; the others are unaffected");
    wait_for(
        "the failing order to be logged",
        Duration::from_secs(60),
        || {
            env.tc
                .node_log(holder)
                .lines()
                // Not the connection errors from before Pebble was started: the CA's verdict.
                .find(|l| {
                    l.contains("ACME order failed") && l.contains(BAD) && !l.contains("(Connect)")
                })
                .map(|l| eprintln!("orderer log: {l}"))
        },
    );
    assert!(env.certs_named(holder, BAD).is_some_and(|c| c.is_empty()));

    phase("SIGKILL the orderer mid-order; another node finishes");
    let before = env
        .metric(holder, "portcullis_acme_lease_fencing_token")
        .unwrap_or(0);
    let out = env.tc.cli(&["cert", "renew", SECOND]);
    // SECOND may still be in its first order; renewal needs a stored certificate.
    let second = wait_for(
        "second certificate stored",
        Duration::from_secs(120),
        || env.certs_named(holder, SECOND)?.into_iter().next(),
    );
    if !out.status.success() {
        let out = env.tc.cli(&["cert", "renew", SECOND]);
        assert!(out.status.success(), "cert renew {SECOND}: {}", show(&out));
    }
    let second_not_after = second["not_after"].as_u64().unwrap_or(0);
    // Kill the holder once it has placed the order and published the answer (its log says so),
    // so the order is in flight when it dies and the next holder must resume it.
    wait_for(
        "the orderer to publish the renewal's answer",
        Duration::from_secs(60),
        || {
            let log = env.tc.node_log(holder);
            let due = log.lines().position(|l| {
                l.contains("certificate due")
                    && l.contains(SECOND)
                    && l.contains("renewal requested")
            })?;
            log.lines()
                .skip(due)
                .any(|l| l.contains("http-01 answer published") && l.contains(SECOND))
                .then_some(())
        },
    );
    let killed_at = std::time::Instant::now();
    env.tc.kill(holder);
    let survivors: Vec<u64> = ids.iter().copied().filter(|id| *id != holder).collect();
    let new_holder = wait_for("a new lease holder", Duration::from_secs(30), || {
        env.holder(&survivors)
    });
    eprintln!(
        "node {new_holder} took the orderer lease {:.1}s after the SIGKILL (lease_secs = 6)",
        killed_at.elapsed().as_secs_f64()
    );
    let after = env
        .metric(new_holder, "portcullis_acme_lease_fencing_token")
        .unwrap_or(0);
    assert!(
        after > before,
        "new fencing token {after} must exceed {before}"
    );
    // Pebble still validates through `other`; if that was the new holder, that is fine too:
    // what matters is that the order completes without the dead node.
    let finished = wait_for(
        "renewal finished by the new holder",
        Duration::from_secs(120),
        || {
            let c = env.certs_named(new_holder, SECOND)?;
            assert!(c.len() <= 1, "exactly one certificate per name: {c:?}");
            let c = c.into_iter().next()?;
            (c["not_after"].as_u64()? > second_not_after).then_some(c)
        },
    );
    eprintln!(
        "finished by node {new_holder} {:.1}s after the SIGKILL: {finished}",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(
        env.tc
            .node_log(new_holder)
            .lines()
            .any(|l| l.contains("certificate issued and stored") && l.contains(SECOND)),
        "node {new_holder} should have finished the order the dead orderer started"
    );
    for id in &survivors {
        wait_for(
            &format!("node {id} serves {SECOND} verified by Pebble's root"),
            Duration::from_secs(20),
            || env.served_serial(*id, SECOND, &root),
        );
    }
    assert!(
        env.tc
            .node_log(new_holder)
            .lines()
            .any(|l| l.contains("resuming the previous holder's order") && l.contains(SECOND)),
        "node {new_holder} should have resumed the dead orderer's order"
    );
    for l in env.tc.node_log(new_holder).lines().filter(|l| {
        l.contains(SECOND)
            && (l.contains("resum") || l.contains("ordering again") || l.contains("issued"))
    }) {
        eprintln!("node {new_holder}: {l}");
    }

    phase("short-lived certificates renew by themselves and serve everywhere");
    let auto_from = env
        .certs_named(new_holder, NAME)
        .and_then(|c| c.into_iter().next())
        .and_then(|c| c["not_after"].as_u64())
        .unwrap_or(0);
    let auto = wait_for(
        "automatic renewal of www",
        Duration::from_secs(LIFETIME_SECS * 2),
        || {
            let c = env.certs_named(new_holder, NAME)?.into_iter().next()?;
            (c["not_after"].as_u64()? > auto_from).then_some(c)
        },
    );
    eprintln!("renewed automatically: {auto}");
    for id in &survivors {
        wait_for(
            &format!("node {id} serves the automatically renewed {NAME}"),
            Duration::from_secs(20),
            || {
                env.served_serial(*id, NAME, &root)
                    .filter(|s| *s != renewed_serial)
            },
        );
    }
    let issued = env
        .pebble_log()
        .matches("Issued certificate serial")
        .count();
    eprintln!("pebble issued {issued} certificates in total");
}
