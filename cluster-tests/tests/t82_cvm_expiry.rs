//! Registration expiry (issue 4): with `wg.expire_after_secs = 3`, a CVM that registered once
//! and went quiet leaves the table and its tunnel address returns to the pool, while a CVM whose
//! agent keeps renewing stays, through several expiry periods.

use std::process::Child;
use std::time::{Duration, Instant};

use portcullis_cluster_tests::cvm::{
    agent_config, issue_credential, register_once, spawn_logged, AgentSpec,
};
use portcullis_cluster_tests::harness::{phase, show, wait_for, TestCluster};

const EXPIRE_AFTER: u64 = 3;

struct Agents(Vec<Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn instances(tc: &TestCluster) -> Option<Vec<serde_json::Value>> {
    let out = tc.cli(&["--json", "cvm", "list"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn tunnel_ip(tc: &TestCluster, id: &str) -> Option<String> {
    instances(tc)?
        .into_iter()
        .find(|i| i["instance_id"] == id)
        .and_then(|i| i["tunnel_ip"].as_str().map(str::to_string))
}

#[test]
fn stale_registrations_expire_and_renewed_ones_stay() {
    let tc = TestCluster::up_with(3, &["--wg-expire-after", &EXPIRE_AFTER.to_string()]);
    let out = tc.cli(&["app", "create", "exp", "--port", "8080"]);
    assert!(out.status.success(), "{}", show(&out));
    issue_credential(&tc, "exp", "cvm-exp");
    let spec = |instance, wg_key, reregister_secs| AgentSpec {
        cred: "cvm-exp",
        app: "exp",
        instance,
        wg_key,
        expose: &[8080],
        reregister_secs,
    };

    phase("a live agent renewing every second, and a CVM that registers once and goes quiet");
    let live_cfg = agent_config(&tc, &spec("exp-live", "live.wg.key", 1));
    let log = tc.path().join("agent-exp-live.log");
    let _agents = Agents(vec![spawn_logged(
        &["cvm-agent", "--config", live_cfg.to_str().expect("utf8")],
        &log,
    )]);
    wait_for("live agent registered", Duration::from_secs(20), || {
        tunnel_ip(&tc, "exp-live")
    });
    let quiet_cfg = agent_config(&tc, &spec("exp-quiet", "quiet.wg.key", 1));
    register_once(&quiet_cfg).expect("quiet CVM registers");
    let quiet_ip = tunnel_ip(&tc, "exp-quiet").expect("quiet CVM has an address");
    let registered = Instant::now();

    phase("the quiet registration expires; the live one stays");
    wait_for("quiet CVM expired", Duration::from_secs(30), || {
        let list = instances(&tc)?;
        (!list.iter().any(|i| i["instance_id"] == "exp-quiet")).then_some(())
    });
    let waited = registered.elapsed();
    assert!(
        waited >= Duration::from_secs(EXPIRE_AFTER - 1),
        "expired after {waited:?}, before its {EXPIRE_AFTER} s were up"
    );
    println!("quiet registration expired {waited:?} after registering");
    // Three more expiry periods: the renewing agent is never dropped.
    let until = Instant::now() + Duration::from_secs(3 * EXPIRE_AFTER);
    while Instant::now() < until {
        if let Some(list) = instances(&tc) {
            // Including the demo app's agents from `up`, which renew every second here.
            for renewing in ["exp-live", "demo-us-east"] {
                assert!(
                    list.iter().any(|i| i["instance_id"] == renewing),
                    "a renewing CVM ({renewing}) expired: {list:?}"
                );
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    phase("the expired address returns to the pool; the leader counted the expiry");
    let next_cfg = agent_config(&tc, &spec("exp-next", "next.wg.key", 1));
    register_once(&next_cfg).expect("a new CVM registers");
    assert_eq!(
        tunnel_ip(&tc, "exp-next").as_deref(),
        Some(quiet_ip.as_str()),
        "the freed address is handed out again"
    );
    let expired: f64 = tc
        .ids()
        .iter()
        .map(|id| {
            let text = tc.metrics(*id);
            text.lines()
                .find_map(|l| l.strip_prefix("portcullis_cvm_expired_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum();
    assert!(expired >= 1.0, "no node counted an expiry");
}
