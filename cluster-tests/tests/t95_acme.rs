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

mod acme_env;

use std::process::Command;
use std::time::Duration;

use acme_env::Env;

use portcullis_cluster_tests::harness::{free_port, phase, run, show, wait_for};

const NAME: &str = "www.shop.test";
const SECOND: &str = "api.shop.test";
/// Resolves to 127.0.0.2, where no node listens: its validation fails, again and again.
const BAD: &str = "bad.shop.test";
/// Pebble's certificate lifetime in this test: short enough that automatic renewal (at a third
/// of the lifetime left) happens during the test.
const LIFETIME_SECS: u64 = 45;

/// Pebble's DNS (`pebble-challtestsrv`: every name is 127.0.0.1, BAD is 127.0.0.2) and the
/// common ACME test environment, with `[acme]` enabled for NAME, SECOND and BAD.
fn start() -> Option<Env> {
    if !acme_env::require(
        "t95_acme",
        &["pebble", "pebble-challtestsrv", "curl"],
        "pebble curl",
    ) {
        return None;
    }
    let dns_port = free_port();
    let challtest_mgmt = free_port();
    let mut env = Env::new("t95-pebble-", dns_port);
    phase("start pebble-challtestsrv (DNS: every name is 127.0.0.1)");
    let mgmt = format!("127.0.0.1:{challtest_mgmt}");
    let dns = format!("127.0.0.1:{dns_port}");
    env.spawn(
        "challtestsrv.log",
        Command::new("pebble-challtestsrv").args([
            "-management",
            &mgmt,
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
    env.enable_acme(&[NAME, SECOND, BAD], toml::Table::new());
    // The failing name: an A record nobody answers on.
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "5", "-X", "POST", "-d"])
        .arg(format!(r#"{{"host":"{BAD}","addresses":["127.0.0.2"]}}"#))
        .arg(format!("http://{mgmt}/add-a")));
    assert!(out.status.success(), "challtestsrv add-a: {}", show(&out));
    Some(env)
}

#[test]
fn acme_http01_through_a_non_orderer_node_renewal_and_orderer_crash() {
    let Some(mut env) = start() else {
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
    env.start_pebble_with(other_http, free_port(), Some(LIFETIME_SECS));
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
    // The orderer seals the new key with the cluster data key before it enters Raft.
    assert!(
        cert["key_encryption"]
            .as_str()
            .unwrap_or("")
            .starts_with("aes-256-gcm:"),
        "key stored unsealed: {cert}"
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
        .log("pebble.log")
        .matches("Issued certificate serial")
        .count();
    eprintln!("pebble issued {issued} certificates in total");
}
