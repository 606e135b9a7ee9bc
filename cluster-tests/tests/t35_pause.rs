//! t35: a paused node (SIGSTOP) must not stall the cluster — RPC deadlines let the leader carry
//! on without a frozen follower, and a frozen leader is replaced. After SIGCONT the paused node
//! rejoins and converges.

use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, show, wait_for, AppJson, TestCluster};

#[test]
fn paused_follower_and_leader() {
    let c = TestCluster::up(3);
    let ids = c.ids();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });
    let follower = *ids.iter().find(|i| **i != leader).expect("follower");

    phase(&format!("SIGSTOP follower {follower}; writes still commit"));
    c.signal(follower, "STOP");
    for i in 0..10 {
        let out = c.cli_at(
            leader,
            &["app", "create", &format!("pf{i}"), "--port", "80"],
        );
        assert!(out.status.success(), "{}", show(&out));
    }
    c.signal(follower, "CONT");

    phase(&format!(
        "SIGSTOP leader {leader}; the others elect a new one and take writes"
    ));
    c.signal(leader, "STOP");
    let others: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();
    let new_leader = wait_for("a new leader", Duration::from_secs(15), || {
        c.agreed_leader(&others).filter(|l| *l != leader)
    });
    for i in 0..10 {
        let out = c.cli_at(
            new_leader,
            &["app", "create", &format!("pl{i}"), "--port", "80"],
        );
        assert!(out.status.success(), "{}", show(&out));
    }

    phase("SIGCONT the old leader; it follows the new one and has every write");
    c.signal(leader, "CONT");
    wait_for("the old leader to follow", Duration::from_secs(15), || {
        (c.status(leader)?.leader_id == Some(new_leader)).then_some(())
    });
    let apps: Vec<AppJson> = wait_for("old leader app list", Duration::from_secs(10), || {
        c.apps_at(leader)
    });
    assert_eq!(
        apps.iter().filter(|a| a.name.starts_with('p')).count(),
        20,
        "{apps:?}"
    );
}
