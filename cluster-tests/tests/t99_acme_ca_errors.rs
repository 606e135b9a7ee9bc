//! Issue 6, bad input: a CA that answers with errors. Pebble is started with every signed
//! request rejected (`badNonce`, after instant-acme's own retries), and the operator asks for a
//! renewal of a certificate the cluster already serves. The orderer must report the CA's error,
//! retry with growing delays, and the current certificate must keep serving on every node.
//!
//! Skips (with a printed reason) when Pebble or curl is not installed.

mod acme_env;

use std::time::Duration;

use acme_env::Env;
use portcullis_cluster_tests::harness::{free_port, phase, wait_for};

const NAME: &str = "www.errors.test";

/// One "ACME order failed" line of the orderer's log.
struct Failure {
    /// Seconds since midnight (UTC), from the line's timestamp.
    at: f64,
    failures: u32,
    retry_in: String,
    line: String,
}

/// The orderer's failure lines for NAME on node `id`.
fn failures(env: &Env, id: u64) -> Vec<Failure> {
    let field = |l: &str, k: &str| -> Option<String> {
        Some(l.split(k).nth(1)?.split_whitespace().next()?.to_string())
    };
    env.tc
        .node_log(id)
        .lines()
        .filter(|l| l.contains("ACME order failed") && l.contains(NAME))
        .filter_map(|l| {
            // 2026-11-26T13:05:38.149379Z
            let time = l.split_whitespace().next()?.split('T').nth(1)?;
            let mut hms = time.trim_end_matches('Z').split(':');
            let (h, m, s): (f64, f64, f64) = (
                hms.next()?.parse().ok()?,
                hms.next()?.parse().ok()?,
                hms.next()?.parse().ok()?,
            );
            Some(Failure {
                at: h * 3600.0 + m * 60.0 + s,
                failures: field(l, "failures=")?.parse().ok()?,
                retry_in: field(l, "retry_in=")?,
                line: l.to_string(),
            })
        })
        .collect()
}

#[test]
fn ca_errors_are_reported_retried_and_the_current_certificate_serves() {
    if !acme_env::require("t99_acme_ca_errors", &["pebble", "curl"], "pebble curl") {
        return;
    }
    let mut env = Env::new("t99-pebble-", free_port());
    let ids = env.tc.ids();

    phase("the cluster serves an imported certificate for the name");
    let (crt, key) = env.tc.issue_dev_cert("t99-current", &[NAME], "current");
    env.tc.import_cert(NAME, &crt, &key);
    let dev_root = env.tc.path().join("pki/dev-ca.pem");
    let serial = wait_for(
        "node 1 serves the imported certificate",
        Duration::from_secs(20),
        || env.served_serial(1, NAME, &dev_root),
    );

    // Only now, with a current certificate in place, does the orderer start: it has nothing
    // to order until the renewal request. Retry delays are 5 s, then the 8 s cap: long enough
    // to see them grow, short enough for CI.
    let mut acme = toml::Table::new();
    acme.insert("retry_max_secs".into(), 8.into());
    env.enable_acme(&[NAME], acme);

    phase("Pebble rejects every signed request; a renewal is requested");
    env.nonce_reject = 100;
    env.start_pebble(free_port(), free_port());
    let holder = wait_for("one lease holder", Duration::from_secs(30), || {
        env.holder(&ids)
    });
    let out = env.tc.cli(&["cert", "renew", NAME]);
    assert!(
        out.status.success(),
        "{}",
        portcullis_cluster_tests::harness::show(&out)
    );

    phase("the orderer reports the CA's error and retries with growing delays");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let seen = loop {
        let f = failures(&env, holder);
        if f.len() >= 3 {
            break f;
        }
        if std::time::Instant::now() > deadline {
            let log = env.tc.node_log(holder);
            let acme: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ACME") || l.contains("acme") || l.contains("certificate"))
                .collect();
            panic!(
                "node {holder} did not report three failed attempts in 90 s; its ACME log:\n{}",
                acme[acme.len().saturating_sub(30)..].join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for f in &seen {
        assert!(
            f.line.contains("badNonce"),
            "the CA's error is not named: {}",
            f.line
        );
    }
    let counts: Vec<u32> = seen.iter().map(|f| f.failures).collect();
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "each retry counts one more failure: {counts:?}"
    );
    // 5 s after the first failure, then the 8 s cap; the attempts wait for them.
    assert_eq!(
        (seen[0].retry_in.as_str(), seen[1].retry_in.as_str()),
        ("5s", "8s"),
        "delays do not grow: {}",
        seen[1].line
    );
    let gaps: Vec<f64> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    eprintln!("failures {counts:?}, gaps between attempts {gaps:?} s");
    assert!(
        gaps[0] >= 4.5 && gaps[1] >= 7.5,
        "retries came sooner than their backoff: {gaps:?}"
    );

    phase("the current certificate keeps serving on every node");
    for id in &ids {
        let s = env
            .served_serial(*id, NAME, &dev_root)
            .unwrap_or_else(|| panic!("node {id} stopped serving {NAME}"));
        assert_eq!(s, serial, "node {id} serves another certificate");
    }
    let stored = env.certs_named(holder, NAME).expect("cert list");
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        stored[0]["issuer"]
            .as_str()
            .unwrap_or("")
            .contains("development"),
        "the stored certificate changed: {stored:?}"
    );
}
