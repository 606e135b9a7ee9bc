//! No tenant can take another's hostname (issue 14, "How it is proven", first test).
//!
//! Two tenants on a 3-node cluster from `portcullis up`: app `bank`, served by an instance the
//! operator registered, and app `evil`, holding a CVM credential of its own. Evil's
//! `cvm-agent` tries every name that would have routed bank's traffic to evil before the
//! namespace rules (`bank`, `bank-8080`, `bank-<bank's port>`, `bank-443s`, `BANK`), bank's
//! own instance id, an id outside its prefix, a sibling id with a new WireGuard key, and more
//! instances than its cap (`wg.max_instances_per_app = 3` here), and faster than its
//! registration rate (a burst of 5, then one per 1000 s). Each is refused with an error
//! that names the clash, and `https://bank.<base>/` keeps answering from bank's instance on
//! every node after each attempt. The operator's admin API is held to the same namespace.

use portcullis_cluster_tests::cvm::{
    agent_config, curl_https, issue_credential, register_once, spawn_demo_app, AgentSpec,
    WithChildren,
};
use portcullis_cluster_tests::harness::{phase, show, TestCluster};

const BASE: &str = "portcullis.localhost";
const CAP: usize = 3;
/// Registrations evil may write through one node before the rate (one per 1000 s) holds it
/// back. Refused attempts and fresh renewals take none.
const BURST: usize = 5;

/// Registers `instance` for app `evil` with evil's credential and WireGuard key file `key`.
fn evil_registers(tc: &TestCluster, instance: &str, key: &str) -> Result<String, String> {
    let cfg = agent_config(
        tc,
        &AgentSpec {
            cred: "cvm-evil",
            app: "evil",
            instance,
            wg_key: key,
            expose: &[8080],
            reregister_secs: 30,
        },
    );
    register_once(&cfg)
}

/// Every node answers `https://bank.<base>/` from bank's own instance.
fn bank_is_served_by_bank(tc: &TestCluster, after: &str) {
    for id in tc.ids() {
        let got = curl_https(tc, id, &format!("bank.{BASE}"), "/");
        let ok = got.as_ref().is_some_and(|(code, body)| {
            *code == 200 && body.contains("\"instance_id\": \"bank-1\"")
        });
        assert!(ok, "after {after}: node {id} answered {got:?}");
    }
}

#[test]
fn a_tenant_cannot_register_names_that_route_another_tenants_traffic() {
    let mut t = WithChildren::new(TestCluster::up_with(
        3,
        &[
            "--wg-max-instances-per-app",
            &CAP.to_string(),
            "--wg-registration-rate-per-app",
            "0.001",
            "--wg-registration-burst-per-app",
            &BURST.to_string(),
        ],
    ));

    phase("bank: an app served by an instance the operator registered");
    let (demo, bank_port) = spawn_demo_app(&t.tc.path().join("bank-1.log"), "bank", "bank-1", &[]);
    t.children.push(demo);
    let tc = &t.tc;
    let bank_port = bank_port.to_string();
    let ok = |args: &[&str]| {
        let out = tc.cli(args);
        assert!(out.status.success(), "{args:?}: {}", show(&out));
    };
    ok(&[
        "app", "create", "bank", "--port", &bank_port, "--port", "8080",
    ]);
    ok(&["app", "create", "evil", "--port", "8080"]);
    ok(&[
        "cvm",
        "register",
        "--instance-id",
        "bank-1",
        "--app",
        "bank",
        "--region",
        "us-east",
        "--backend",
        &format!("127.0.0.1:{bank_port}"),
    ]);
    issue_credential(tc, "evil", "cvm-evil");
    for id in tc.ids() {
        portcullis_cluster_tests::cvm::wait_served(tc, id, &format!("bank.{BASE}"), "/");
    }
    bank_is_served_by_bank(tc, "setup");

    phase("evil's own instance registers");
    evil_registers(tc, "evil-1", "evil-1.wg.key").expect("evil-1 is evil's to name");

    phase("evil's credential is refused every name that routes bank's traffic");
    let attempts: [(&str, &str); 8] = [
        ("bank", "is the name of app \"bank\""),
        ("bank-8080", "route to its port 8080"),
        ("bank-443s", "reserved routing form"),
        ("BANK", "lowercase DNS label"),
        ("bank-1", "belongs to app \"bank\""),
        ("evil-1-8080", "is instance \"evil-1\"'s route to port 8080"),
        ("web-7", "must start with its app's name"),
        ("evil", "is the name of app \"evil\""),
    ];
    for (i, (id, why)) in attempts.iter().enumerate() {
        let key = format!("attempt-{i}.wg.key");
        let e = evil_registers(tc, id, &key).expect_err(id);
        assert!(e.contains(why), "{id}: expected {why:?} in:\n{e}");
        println!("refused {id}: {}", e.lines().last().unwrap_or_default());
        bank_is_served_by_bank(tc, id);
    }
    let port_route = format!("bank-{bank_port}");
    let e = evil_registers(tc, &port_route, "port-route.wg.key").expect_err("bank's port route");
    assert!(
        e.contains(&format!("route to its port {bank_port}")),
        "{port_route}: {e}"
    );
    bank_is_served_by_bank(tc, &port_route);

    phase("a credential for evil cannot register under app bank");
    let cfg = agent_config(
        tc,
        &AgentSpec {
            cred: "cvm-evil",
            app: "bank",
            instance: "bank-2",
            wg_key: "bank-2.wg.key",
            expose: &[8080],
            reregister_secs: 30,
        },
    );
    let e = register_once(&cfg).expect_err("credential for another app");
    assert!(e.contains("this credential is for app \"evil\""), "{e}");
    bank_is_served_by_bank(tc, "a registration under app bank");

    phase("a sibling id re-registered with a new key is refused; the old key still renews");
    let e = evil_registers(tc, "evil-1", "evil-1-new.wg.key").expect_err("re-key");
    assert!(e.contains("another WireGuard key"), "{e}");
    evil_registers(tc, "evil-1", "evil-1.wg.key").expect("renewal with the same key");

    phase("the per-app cap: at most 3 instances for evil");
    for id in ["evil-2", "evil-blue"] {
        evil_registers(tc, id, &format!("{id}.wg.key")).expect("under the cap");
    }
    let e = evil_registers(tc, "evil-9", "evil-9.wg.key").expect_err("over the cap");
    assert!(
        e.contains(&format!("already has {CAP} instances")) && e.contains("max_instances_per_app"),
        "{e}"
    );
    evil_registers(tc, "evil-2", "evil-2.wg.key").expect("a renewal is never refused by the cap");

    phase("the operator's admin API is held to the same namespace");
    let out = tc.cli(&[
        "cvm",
        "register",
        "--instance-id",
        "bank-8080",
        "--app",
        "evil",
        "--region",
        "us-east",
        "--backend",
        "127.0.0.1",
    ]);
    assert!(!out.status.success(), "bank-8080 for evil was accepted");
    assert!(
        show(&out).contains("route to its port 8080"),
        "{}",
        show(&out)
    );
    let out = tc.cli(&["app", "create", "evil-blue", "--port", "8080"]);
    assert!(
        !out.status.success(),
        "an app named like an instance was created"
    );
    assert!(show(&out).contains("taken by instance"), "{}", show(&out));
    bank_is_served_by_bank(tc, "the operator's refused writes");

    phase("the per-app registration rate: the burst is spent, then a clear refusal");
    // evil-1, evil-2 and evil-blue took 3 of the 5; make room under the cap and spend the rest.
    for id in ["evil-2", "evil-blue"] {
        ok(&["cvm", "remove", id]);
    }
    for id in ["evil-3", "evil-4"] {
        evil_registers(tc, id, &format!("{id}.wg.key")).expect("within the burst");
    }
    ok(&["cvm", "remove", "evil-4"]);
    let e = evil_registers(tc, "evil-5", "evil-5.wg.key").expect_err("over the rate");
    assert!(
        e.contains("ResourceExhausted") && e.contains("wg.registration_rate_per_app"),
        "{e}"
    );
    bank_is_served_by_bank(tc, "the rate limit");

    phase("no name collision in the applied state, on any node");
    for id in tc.ids() {
        let out = tc.cli_at(id, &["--json", "cluster", "status"]);
        assert!(out.status.success(), "{}", show(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(
            v["name_collisions"],
            serde_json::json!([]),
            "node {id}: {v}"
        );
        let m = tc.metrics(id);
        assert!(
            m.lines().any(|l| l == "portcullis_name_collisions 0"),
            "node {id} metrics lack portcullis_name_collisions 0"
        );
    }
}
