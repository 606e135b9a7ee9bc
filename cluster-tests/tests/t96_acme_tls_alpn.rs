//! TLS-ALPN-01 (RFC 8737) against the real Pebble CA, through a 3-node cluster.
//!
//! - pebble-challtestsrv is Pebble's DNS (every name is 127.0.0.1); nothing listens on Pebble's
//!   `httpPort`, so only TLS-ALPN-01 can succeed.
//! - Pebble's `tlsPort` is the HTTPS port of a node that does NOT hold the orderer lease: the
//!   `acme-tls/1` handshake can only be answered from the replicated challenge table.
//! - The issued certificate verifies (curl) against Pebble's root on all three nodes.
//! - An `acme-tls/1` ClientHello for a name without a pending challenge gets no certificate.
//!
//! Skips (with a printed reason) when Pebble, curl or openssl is missing and not root.

mod acme_env;

use std::process::Command;
use std::time::Duration;

use acme_env::{port_of, require, Env};
use portcullis_cluster_tests::harness::{free_port, phase, run, wait_for};

const NAME: &str = "alpn.shop.test";

/// `openssl s_client` offering only `alpn` for `sni`: the negotiated ALPN and whether a
/// certificate came back.
fn tls_probe(port: u16, sni: &str, alpn: &str) -> (Option<String>, bool) {
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "openssl s_client -connect 127.0.0.1:{port} -servername {sni} -alpn {alpn} </dev/null 2>&1"
    )));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let alpn = text
        .lines()
        .find_map(|l| l.strip_prefix("ALPN protocol: "))
        .map(|s| s.trim().to_string());
    (alpn, text.contains("BEGIN CERTIFICATE"))
}

#[test]
fn acme_tls_alpn01_answered_by_a_non_orderer_node() {
    if !require(
        "t96_acme_tls_alpn",
        &["pebble", "pebble-challtestsrv", "curl", "openssl"],
        "pebble curl openssl",
    ) {
        return;
    }
    let dns_port = free_port();
    let mut env = Env::new("t96-pebble-", dns_port);
    phase("start pebble-challtestsrv (DNS: every name is 127.0.0.1)");
    let mgmt = free_port().to_string();
    let dns = format!("127.0.0.1:{dns_port}");
    env.spawn(
        "challtestsrv.log",
        Command::new("pebble-challtestsrv").args([
            "-management",
            &format!("127.0.0.1:{mgmt}"),
            "-dns01",
            &dns,
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
        ]),
    );
    let mut extra = toml::Table::new();
    extra.insert("challenge".into(), "tls-alpn-01".into());
    env.enable_acme(&[NAME], extra);
    let ids = env.tc.ids();

    phase("wait for exactly one orderer lease holder");
    let holder = wait_for("one lease holder", Duration::from_secs(30), || {
        env.holder(&ids)
    });
    let other = *ids.iter().find(|id| **id != holder).expect("another node");
    let other_https = port_of(&env.tc.node(other).https_addr);
    eprintln!(
        "orderer is node {holder}; Pebble validates through node {other} (port {other_https})"
    );

    // Nothing listens on the HTTP port Pebble is given: HTTP-01 could not pass.
    env.start_pebble(free_port(), other_https);
    let started = std::time::Instant::now();

    phase("wait for the certificate in the replicated state");
    let cert = wait_for("ACME certificate stored", Duration::from_secs(120), || {
        env.certs_named(holder, NAME)?.into_iter().next()
    });
    eprintln!(
        "issued {NAME} in {:.1}s from Pebble start: {cert}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        cert["issuer"].as_str().unwrap_or("").contains("Pebble"),
        "issuer {cert}"
    );
    let holder_log = env.tc.node_log(holder);
    assert!(
        holder_log
            .lines()
            .any(|l| l.contains("tls-alpn-01 answer published") && l.contains(NAME)),
        "the orderer should have used tls-alpn-01"
    );
    // The orderer waited for every voter to apply the answer (not a fixed sleep).
    let applied = holder_log
        .lines()
        .find(|l| l.contains("answer applied on every voter") && l.contains(NAME))
        .expect("the orderer should have waited for every voter to apply the answer");
    eprintln!("orderer: {applied}");
    assert!(
        env.tc
            .node_log(other)
            .lines()
            .any(|l| l.contains("answered ACME tls-alpn-01 challenge") && l.contains(NAME)),
        "node {other} should have answered the CA's acme-tls/1 handshake"
    );
    assert!(
        !holder_log.contains("answered ACME tls-alpn-01 challenge"),
        "the orderer itself must not have been asked"
    );

    phase("curl verifies the certificate on all three nodes against Pebble's root");
    let root = env.pebble_root();
    for id in &ids {
        let serial = wait_for(
            &format!("node {id} serves {NAME} verified by Pebble's root"),
            Duration::from_secs(20),
            || env.served_serial(*id, NAME, &root),
        );
        eprintln!("node {id} serves {NAME}, serial {serial}");
    }

    phase("acme-tls/1 without a pending challenge is refused");
    // The probe itself works: ordinary ALPN gets the issued certificate.
    let (alpn, cert) = tls_probe(other_https, NAME, "h2");
    assert!(
        alpn.as_deref() == Some("h2") && cert,
        "h2 probe: alpn {alpn:?}, certificate {cert}"
    );
    for sni in [NAME, "nothing.shop.test"] {
        let (alpn, cert) = tls_probe(other_https, sni, "acme-tls/1");
        assert!(
            alpn.as_deref() != Some("acme-tls/1") && !cert,
            "{sni}: acme-tls/1 must be refused now (alpn {alpn:?}, certificate {cert})"
        );
    }
    eprintln!("acme-tls/1 handshakes without a pending challenge got no certificate");
}
