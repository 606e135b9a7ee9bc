//! DNS-01 for wildcards against the real Pebble CA and a real authoritative server (Knot DNS,
//! Debian package `knot`), through a 3-node cluster.
//!
//! - Knot serves `shop.test` on 127.0.0.1:<free port> and accepts RFC 2136 updates signed with
//!   a TSIG key made by `keymgr -t`; the nodes read that same file as their secret file.
//! - Pebble resolves through Knot (`-dnsserver`), so its DNS-01 lookup of
//!   `_acme-challenge.shop.test` sees exactly what the orderer added.
//! - The cluster orders `*.shop.test`; curl verifies `anything.shop.test` on all three nodes
//!   against Pebble's root; the TXT record is gone afterwards; only the lease holder updated DNS.
//! - A direct test drives the update client against Knot: add, visible, remove, and a wrong key
//!   is refused.
//!
//! Skips (with a printed reason) when a tool is missing and not root.

mod acme_env;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use acme_env::{require, Env};
use portcullis_cluster_tests::harness::{free_port, phase, run, show, wait_for};
use portcullis_node::acme::config::Dns01Config;
use portcullis_node::acme::dns01::{Dns01Client, Dns01Error};

const ZONE: &str = "shop.test";
const WILDCARD: &str = "*.shop.test";
const KEY_NAME: &str = "acme-key";
const TOOLS: &[&str] = &["knotd", "keymgr", "kdig"];

/// Knot DNS serving `shop.test` from a tempdir; killed on drop.
struct Knot {
    child: Child,
    port: u16,
    /// `keymgr -t` output: Knot includes it, and the nodes read it as their secret file.
    key_file: PathBuf,
    dir: PathBuf,
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Knot {
    fn start(dir: &Path) -> Knot {
        let dir = dir.join("knot");
        std::fs::create_dir_all(dir.join("db")).expect("knot dir");
        let out = run(Command::new("keymgr").args(["-t", KEY_NAME, "hmac-sha256"]));
        assert!(out.status.success(), "keymgr -t: {}", show(&out));
        let key_file = dir.join("acme-key.conf");
        std::fs::write(&key_file, &out.stdout).expect("write key");
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "server:\n    listen: 127.0.0.1@{port}\n    rundir: {d}\n\
             database:\n    storage: {d}/db\n\
             include: {d}/acme-key.conf\n\
             acl:\n  - id: acme_update\n    key: {KEY_NAME}\n    action: update\n\
             template:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\n    zonefile-sync: -1\n\
             zone:\n  - domain: {ZONE}\n    acl: acme_update\n\
             log:\n  - target: stderr\n    any: info\n"
        );
        std::fs::write(dir.join("knot.conf"), conf).expect("write knot.conf");
        // Every name in the zone is 127.0.0.1, where the nodes listen.
        let zone = format!(
            "$ORIGIN {ZONE}.\n$TTL 60\n\
             @ SOA ns.{ZONE}. admin.{ZONE}. 1 3600 600 86400 60\n\
             @ NS ns.{ZONE}.\nns A 127.0.0.1\n@ A 127.0.0.1\n* A 127.0.0.1\n"
        );
        std::fs::write(dir.join(format!("{ZONE}.zone")), zone).expect("write zone");
        let log = std::fs::File::create(dir.join("knotd.log")).expect("log");
        let child = Command::new("knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start knotd");
        let knot = Knot {
            child,
            port,
            key_file,
            dir,
        };
        wait_for("knotd to serve the zone", Duration::from_secs(20), || {
            knot.dig(ZONE, "SOA")
                .iter()
                .any(|l| l.contains("admin"))
                .then_some(())
        });
        knot
    }

    /// `kdig +short` answers from Knot.
    fn dig(&self, name: &str, rtype: &str) -> Vec<String> {
        let out = run(Command::new("kdig").args([
            "@127.0.0.1",
            "-p",
            &self.port.to_string(),
            "+short",
            "+time=2",
            "+retry=0",
            name,
            rtype,
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default()
    }

    fn dns01(&self, key_file: &Path) -> Dns01Config {
        Dns01Config {
            server: Some(format!("127.0.0.1:{}", self.port).parse().expect("addr")),
            zone: ZONE.into(),
            tsig_key_name: KEY_NAME.into(),
            tsig_secret_file: Some(key_file.to_path_buf()),
            propagation_timeout_secs: 10,
            ..Dns01Config::default()
        }
    }
}

#[test]
fn rfc2136_updates_signed_with_tsig_against_knot() {
    if !require("t97_acme_dns01", TOOLS, "knot knot-dnsutils") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("t97-knot-")
        .tempdir()
        .expect("tempdir");
    let knot = Knot::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = Dns01Client::from_config(&knot.dns01(&knot.key_file), Duration::from_secs(5))
        .expect("client from keymgr output");
    let record = format!("_acme-challenge.www.{ZONE}");
    rt.block_on(async {
        client
            .add_txt(&format!("www.{ZONE}"), "first-value")
            .await
            .expect("add");
        client
            .add_txt(&format!("www.{ZONE}"), "second-value")
            .await
            .expect("add another");
        client
            .wait_visible(&format!("www.{ZONE}"), "first-value")
            .await
            .expect("visible");
    });
    let mut txt = knot.dig(&record, "TXT");
    txt.sort();
    assert_eq!(txt, vec!["\"first-value\"", "\"second-value\""]);
    rt.block_on(async {
        client
            .remove_txt(&format!("www.{ZONE}"), "first-value")
            .await
            .expect("remove");
        // Removing what is gone is not an error (a retried cleanup).
        client
            .remove_txt(&format!("www.{ZONE}"), "first-value")
            .await
            .expect("remove again");
    });
    assert_eq!(
        knot.dig(&record, "TXT"),
        vec!["\"second-value\""],
        "only that value removed"
    );

    phase("a wrong TSIG secret is refused and changes nothing");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC13cm9uZyE=\n").expect("write");
    let bad =
        Dns01Client::from_config(&knot.dns01(&wrong), Duration::from_secs(5)).expect("client");
    let r = rt.block_on(bad.add_txt(&format!("www.{ZONE}"), "forged"));
    assert!(matches!(r, Err(Dns01Error::Rcode { .. })), "{r:?}");
    eprintln!(
        "wrong key: {}",
        r.err().map(|e| e.to_string()).unwrap_or_default()
    );
    assert_eq!(knot.dig(&record, "TXT"), vec!["\"second-value\""]);
    let outside = rt.block_on(client.add_txt("www.example.org", "x"));
    assert!(
        matches!(outside, Err(Dns01Error::OutsideZone { .. })),
        "{outside:?}"
    );
}

#[test]
fn acme_dns01_wildcard_through_the_cluster() {
    if !require(
        "t97_acme_dns01",
        &["pebble", "curl", "knotd", "keymgr", "kdig"],
        "pebble curl knot knot-dnsutils",
    ) {
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("t97-knot-")
        .tempdir()
        .expect("tempdir");
    phase("start knotd (zone shop.test, TSIG-signed updates)");
    let knot = Knot::start(scratch.path());
    let mut env = Env::new("t97-pebble-", knot.port);
    let mut dns01 = toml::Table::new();
    dns01.insert("server".into(), format!("127.0.0.1:{}", knot.port).into());
    dns01.insert("zone".into(), ZONE.into());
    dns01.insert("tsig_key_name".into(), KEY_NAME.into());
    dns01.insert(
        "tsig_secret_file".into(),
        knot.key_file.display().to_string().into(),
    );
    dns01.insert("propagation_timeout_secs".into(), 20.into());
    let mut extra = toml::Table::new();
    extra.insert("dns01".into(), dns01.into());
    env.enable_acme(&[WILDCARD], extra);
    let ids = env.tc.ids();

    phase("wait for exactly one orderer lease holder");
    let holder = wait_for("one lease holder", Duration::from_secs(30), || {
        env.holder(&ids)
    });
    eprintln!("orderer is node {holder}");
    env.start_pebble(free_port(), free_port());
    let started = std::time::Instant::now();

    phase("wait for the wildcard certificate in the replicated state");
    let cert = wait_for(
        "wildcard certificate stored",
        Duration::from_secs(120),
        || env.certs_named(holder, WILDCARD)?.into_iter().next(),
    );
    eprintln!(
        "issued {WILDCARD} in {:.1}s from Pebble start: {cert}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cert["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "issuer {cert}"
    );
    // The record is removed after the order completes, which can be just after the certificate
    // is stored: wait for the line rather than read the log once.
    for expected in [
        "dns-01 TXT record added and visible",
        "dns-01 TXT record removed",
    ] {
        wait_for(
            &format!("orderer log line {expected:?}"),
            Duration::from_secs(15),
            || {
                env.tc
                    .node_log(holder)
                    .lines()
                    .any(|l| l.contains(expected) && l.contains(ZONE))
                    .then_some(())
            },
        );
    }
    for id in ids.iter().filter(|id| **id != holder) {
        assert!(
            !env.tc.node_log(*id).contains("dns-01 TXT record added"),
            "node {id} does not hold the lease and must not update DNS"
        );
    }
    assert!(
        knot.log().contains("DDNS"),
        "knot should have processed dynamic updates:\n{}",
        knot.log()
    );

    phase("the TXT record is removed after validation");
    wait_for("TXT record removed", Duration::from_secs(10), || {
        knot.dig(&format!("_acme-challenge.{ZONE}"), "TXT")
            .is_empty()
            .then_some(())
    });

    phase("curl verifies anything.shop.test on all three nodes against Pebble's root");
    let root = env.pebble_root();
    for id in &ids {
        for host in ["anything.shop.test", "other.shop.test"] {
            let serial = wait_for(
                &format!("node {id} serves {host} verified by Pebble's root"),
                Duration::from_secs(20),
                || env.served_serial(*id, host, &root),
            );
            eprintln!("node {id} serves {host} with the wildcard, serial {serial}");
        }
    }
}
