//! t10: a fresh 3-node cluster has exactly one leader, three voters, and every node agrees.

use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, wait_for, TestCluster};

#[test]
fn three_nodes_one_leader_three_voters() {
    phase("start a 3-node cluster");
    let c = TestCluster::up(3);
    let ids = c.ids();
    assert_eq!(ids.len(), 3);

    phase("every node reports the same leader");
    let leader = wait_for(
        "all nodes agree on a leader",
        Duration::from_secs(10),
        || c.agreed_leader(&ids),
    );
    assert!(ids.contains(&leader), "leader {leader} is not a member");

    phase("exactly one node is leader, and there are three voters with their regions");
    let mut leaders = 0;
    for id in &ids {
        let s = c.status(*id).expect("status");
        assert_eq!(s.node_id, *id);
        assert_eq!(s.leader_id, Some(leader));
        assert!(s.term >= 1);
        assert_eq!(s.members.len(), 3, "{s:?}");
        assert!(s.members.iter().all(|m| m.voter), "{s:?}");
        let regions: Vec<&str> = s.members.iter().map(|m| m.region.as_str()).collect();
        assert_eq!(regions, ["us-east", "eu-west", "ap-south"]);
        if s.node_id == leader {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1);

    phase("cluster.json names every node with its addresses and pid");
    for n in &c.info.nodes {
        assert!(
            n.pid > 0
                && !n.admin_addr.is_empty()
                && !n.https_addr.is_empty()
                && !n.http_addr.is_empty()
        );
    }
}
