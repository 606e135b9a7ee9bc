//! t20: membership changes through the CLI — add a learner, promote it, remove a voter — with
//! `cluster status` showing each step on every node.

use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, show, wait_for, TestCluster};

#[test]
fn add_learner_promote_remove() {
    let c = TestCluster::up(3);
    let ids = c.ids();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });

    phase("issue a certificate for node 4 from the cluster CA and start it");
    let node4 = c.start_extra_node(4, "eu-central");
    let (rpc, admin) = (node4.rpc_addr.clone(), node4.admin_addr.clone());

    phase("add node 4 as a learner, through a follower");
    let follower = *ids.iter().find(|i| **i != leader).expect("a follower");
    let out = c.cli_at(
        follower,
        &[
            "cluster",
            "add-learner",
            "4",
            &rpc,
            "--region",
            "eu-central",
            "--admin-addr",
            &admin,
        ],
    );
    assert!(out.status.success(), "{}", show(&out));
    for id in &ids {
        wait_for(
            &format!("node {id} to list 4 as a learner"),
            Duration::from_secs(10),
            || {
                let s = c.status(*id)?;
                s.members
                    .iter()
                    .any(|m| m.id == 4 && !m.voter && m.region == "eu-central")
                    .then_some(())
            },
        );
    }

    phase("promote node 4 to voter");
    let out = c.cli(&["cluster", "promote", "4"]);
    assert!(out.status.success(), "{}", show(&out));
    for id in &ids {
        wait_for(
            &format!("node {id} to list 4 as a voter"),
            Duration::from_secs(10),
            || {
                let s = c.status(*id)?;
                (s.members.len() == 4 && s.members.iter().all(|m| m.voter)).then_some(())
            },
        );
    }

    phase("promoting an unknown node is refused");
    let out = c.cli(&["cluster", "promote", "99"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("99"),
        "{}",
        show(&out)
    );

    phase("remove voter 1");
    let out = c.cli(&["cluster", "remove", "1"]);
    assert!(out.status.success(), "{}", show(&out));
    for id in [2, 3] {
        wait_for(
            &format!("node {id} to drop node 1"),
            Duration::from_secs(10),
            || {
                let s = c.status(id)?;
                let members: Vec<u64> = s.members.iter().map(|m| m.id).collect();
                (members == [2, 3, 4]
                    && s.members.iter().all(|m| m.voter)
                    && s.leader_id.is_some_and(|l| l != 1))
                .then_some(())
            },
        );
    }

    phase("the remaining cluster accepts writes, and node 4 has them");
    let out = c.cli_at(2, &["app", "create", "after-remove", "--port", "80"]);
    assert!(out.status.success(), "{}", show(&out));
    wait_for("node 4 to have the app", Duration::from_secs(10), || {
        let out = node4.cli(&["app", "list", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .contains("after-remove")
            .then_some(())
    });
}
