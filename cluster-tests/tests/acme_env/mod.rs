//! Pebble and a 3-node cluster with `[acme]` enabled, shared by the TLS-ALPN-01 (t96) and DNS-01
//! (t97) tests. t95 keeps its own copy (it also drives pebble-challtestsrv's management API).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use portcullis_cluster_tests::harness::{
    free_port, phase, portcullis_bin, run, show, wait_for, TestCluster,
};

pub fn installed(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// True when every binary is there. Otherwise prints why the test is skipped, or panics when
/// running as root (CI installs them: a missing binary there is a broken setup, not a skip).
pub fn require(test: &str, bins: &[&str], debian: &str) -> bool {
    let missing: Vec<&str> = bins.iter().copied().filter(|b| !installed(b)).collect();
    if missing.is_empty() {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    assert!(
        !root,
        "{test}: {missing:?} not installed although running as root (apt-get install {debian})"
    );
    eprintln!(
        "SKIP {test}: {missing:?} not installed and not root (Debian: apt-get install {debian})"
    );
    false
}

/// Children (DNS servers, Pebble) and the cluster; all stopped on drop.
pub struct Env {
    pub tc: TestCluster,
    pub dir: tempfile::TempDir,
    pub children: Vec<Child>,
    pub pebble_port: u16,
    pub pebble_mgmt: u16,
    /// Pebble's DNS resolver.
    pub dns_port: u16,
    /// `PEBBLE_WFE_NONCEREJECT` for the next Pebble start: the percentage of valid nonces
    /// Pebble rejects with `badNonce` (0: none; 100: every signed request fails).
    pub nonce_reject: u32,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.tc.down();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A CA and a `localhost`/127.0.0.1 leaf for Pebble's HTTPS listeners.
fn pebble_tls(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "pebble https ca");
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
}

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("address with a port")
}

impl Env {
    /// A tempdir with Pebble's HTTPS certificate, and a 3-node cluster. Call [`Env::enable_acme`]
    /// next (the directory URL is known once `pebble_port` is chosen).
    pub fn new(prefix: &str, dns_port: u16) -> Env {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("tempdir");
        pebble_tls(dir.path());
        phase("start a 3-node cluster");
        Env {
            tc: TestCluster::up(3),
            dir,
            children: Vec::new(),
            pebble_port: free_port(),
            pebble_mgmt: free_port(),
            dns_port,
            nonce_reject: 0,
        }
    }

    /// Rolling restart with `[acme]` = the common test settings plus `extra`.
    pub fn enable_acme(&mut self, domains: &[&str], extra: toml::Table) {
        phase("enable [acme] on every node (rolling restart)");
        let directory = format!("https://127.0.0.1:{}/dir", self.pebble_port);
        let ca = self.dir.path().join("pebble-https-ca.pem");
        for id in self.tc.ids() {
            let path = self.tc.node(id).config.clone();
            let text = std::fs::read_to_string(&path).expect("read config");
            let mut cfg: toml::Table = toml::from_str(&text).expect("parse config");
            let mut acme = toml::Table::new();
            acme.insert("enabled".into(), true.into());
            acme.insert("directory".into(), directory.clone().into());
            acme.insert("extra_root".into(), ca.display().to_string().into());
            acme.insert(
                "domains".into(),
                toml::Value::Array(domains.iter().map(|d| (*d).into()).collect()),
            );
            acme.insert("include_base_domains".into(), false.into());
            acme.insert("lease_secs".into(), 6.into());
            acme.insert("retry_max_secs".into(), 2.into());
            acme.insert("check_interval_secs".into(), 2.into());
            acme.insert("request_timeout_secs".into(), 30.into());
            for (k, v) in &extra {
                acme.insert(k.clone(), v.clone());
            }
            cfg.insert("acme".into(), acme.into());
            std::fs::write(&path, toml::to_string(&cfg).expect("toml")).expect("write config");
            let out = run(Command::new(portcullis_bin())
                .arg("check-config")
                .arg(&path));
            assert!(out.status.success(), "check-config: {}", show(&out));
            self.tc.stop(id);
            self.tc.start_node(id);
        }
    }

    /// Starts a logged child process kept until the test ends.
    pub fn spawn(&mut self, log_name: &str, cmd: &mut Command) {
        let log = std::fs::File::create(self.dir.path().join(log_name)).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {cmd:?}: {e}"));
        self.children.push(child);
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    pub fn metric(&self, id: u64, name: &str) -> Option<i64> {
        self.tc
            .metrics(id)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The single node reporting `portcullis_acme_lease_held 1`, if exactly one does.
    pub fn holder(&self, among: &[u64]) -> Option<u64> {
        let held: Vec<u64> = among
            .iter()
            .copied()
            .filter(|id| self.metric(*id, "portcullis_acme_lease_held") == Some(1))
            .collect();
        (held.len() == 1).then(|| held[0])
    }

    /// Starts Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`, resolving
    /// names through `dns_port`.
    pub fn start_pebble(&mut self, http_port: u16, tls_port: u16) {
        self.start_pebble_with(http_port, tls_port, None);
    }

    /// [`Env::start_pebble`], with Pebble's certificate lifetime set to `validity_secs` (short
    /// lifetimes make renewal happen during a test).
    pub fn start_pebble_with(&mut self, http_port: u16, tls_port: u16, validity_secs: Option<u64>) {
        phase(&format!(
            "start pebble (httpPort {http_port}, tlsPort {tls_port}, DNS 127.0.0.1:{})",
            self.dns_port
        ));
        let cfg = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.pebble_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.pebble_mgmt),
                "certificate": self.dir.path().join("pebble-https.pem"),
                "privateKey": self.dir.path().join("pebble-https.key"),
                "httpPort": http_port,
                "tlsPort": tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        let mut cfg = cfg;
        if let Some(secs) = validity_secs {
            cfg["pebble"]["certificateValidityPeriod"] = secs.into();
        }
        let path = self.dir.path().join("pebble.json");
        std::fs::write(&path, cfg.to_string()).expect("write pebble config");
        let dns = format!("127.0.0.1:{}", self.dns_port);
        self.spawn(
            "pebble.log",
            Command::new("pebble")
                .arg("-config")
                .arg(&path)
                .args(["-dnsserver", &dns])
                // No random validation delay; deliberate nonce rejections only when asked.
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", self.nonce_reject.to_string())
                .env("PEBBLE_AUTHZREUSE", "0"),
        );
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
    pub fn pebble_root(&self) -> PathBuf {
        let out = run(Command::new("curl")
            .args(["-sS", "--max-time", "5", "--cacert"])
            .arg(self.dir.path().join("pebble-https-ca.pem"))
            .arg(format!("https://127.0.0.1:{}/roots/0", self.pebble_mgmt)));
        assert!(out.status.success(), "fetch pebble root: {}", show(&out));
        let path = self.dir.path().join("pebble-root.pem");
        std::fs::write(&path, &out.stdout).expect("write root");
        path
    }

    /// `cert list --json` entries for `name`, from node `id`.
    pub fn certs_named(&self, id: u64, name: &str) -> Option<Vec<serde_json::Value>> {
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

    /// curl to `https://<host>/` on node `id`, verifying against `root`. Returns the leaf's
    /// serial (or "verified" on curl versions that cannot print it).
    pub fn served_serial(&self, id: u64, host: &str, root: &Path) -> Option<String> {
        let port = port_of(&self.tc.node(id).https_addr);
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
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg("--cacert")
            .arg(root)
            .arg(format!("https://{host}:{port}/")));
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Some(
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("Serial Number:")
                        .map(|s| s.trim().to_string())
                })
                .unwrap_or_else(|| "verified".into()),
        )
    }
}
