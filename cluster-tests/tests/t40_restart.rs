//! t40: stop every node, start them again; the replicated state is intact.

use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, show, wait_for, AppJson, TestCluster};

#[test]
fn full_restart_keeps_state() {
    let mut c = TestCluster::up(3);
    let ids = c.ids();
    wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });

    phase("write some apps");
    for i in 0..20 {
        let out = c.cli(&[
            "app",
            "create",
            &format!("app{i}"),
            "--port",
            "8080",
            "--port",
            &(9000 + i).to_string(),
        ]);
        assert!(out.status.success(), "{}", show(&out));
    }
    let before = c.apps_at(1).expect("apps");
    assert_eq!(
        before.iter().filter(|a| a.name.starts_with("app")).count(),
        20,
        "{before:?}"
    );

    phase("stop every node (SIGTERM)");
    for id in &ids {
        c.stop(*id);
    }

    phase("start them again");
    for id in &ids {
        c.start_node(*id);
    }
    let leader = wait_for("a leader after restart", Duration::from_secs(20), || {
        c.agreed_leader(&ids)
    });
    eprintln!("leader after restart: {leader}");

    phase("every node has the same apps as before");
    for id in &ids {
        let after: Vec<AppJson> = wait_for(
            &format!("node {id} app list"),
            Duration::from_secs(10),
            || c.apps_at(*id),
        );
        assert_eq!(after, before, "node {id}");
    }

    phase("and the cluster still takes writes");
    let out = c.cli(&["app", "create", "after-restart", "--port", "80"]);
    assert!(out.status.success(), "{}", show(&out));
}
