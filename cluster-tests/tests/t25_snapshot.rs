//! t25: snapshots are built, streamed and installed. With a tiny snapshot interval and no log kept
//! behind snapshots, a learner that joins late can only catch up from a snapshot sent over the
//! cluster RPC port; it must end up with every app.

use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, show, wait_for, AppJson, TestCluster};

#[test]
fn late_learner_catches_up_from_a_snapshot() {
    let c = TestCluster::up_with(3, &["--snapshot-every", "10"]);
    let ids = c.ids();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });

    phase("write 40 apps so the leader snapshots and purges its log");
    for i in 0..40 {
        let out = c.cli(&["app", "create", &format!("s{i}"), "--port", "80"]);
        assert!(out.status.success(), "{}", show(&out));
    }
    let s = wait_for(
        "the leader to purge its log",
        Duration::from_secs(10),
        || {
            let s = c.status(leader)?;
            (s.purged_index >= 10 && s.snapshot_index >= 10).then_some(s)
        },
    );
    eprintln!(
        "leader snapshot at {}, purged through {}",
        s.snapshot_index, s.purged_index
    );

    phase("start node 4 with an empty store and add it as a learner");
    let node4 = c.start_extra_node(4, "us-west");
    let (rpc, admin) = (node4.rpc_addr.clone(), node4.admin_addr.clone());
    let out = c.cli(&[
        "cluster",
        "add-learner",
        "4",
        &rpc,
        "--region",
        "us-west",
        "--admin-addr",
        &admin,
    ]);
    assert!(out.status.success(), "{}", show(&out));

    phase("node 4 installed a snapshot and has every app");
    let node4_cli = |args: &[&str]| node4.cli(args);
    let s4 = wait_for(
        "node 4 to install a snapshot",
        Duration::from_secs(20),
        || {
            let out = node4_cli(&["cluster", "status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (s["snapshot_index"].as_u64()? >= 10).then_some(s)
        },
    );
    eprintln!("node 4 snapshot index {}", s4["snapshot_index"]);
    let apps: Vec<AppJson> = wait_for("node 4 app list", Duration::from_secs(10), || {
        serde_json::from_slice(&node4_cli(&["app", "list", "--json"]).stdout).ok()
    });
    // `up` also created its demo app.
    assert_eq!(
        apps.iter().filter(|a| a.name.starts_with('s')).count(),
        40,
        "{apps:?}"
    );
}
