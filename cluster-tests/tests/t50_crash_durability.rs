//! t50: SIGKILL followers and the leader repeatedly while several clients write; every
//! acknowledged write is present on every node afterwards.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_cluster_tests::harness::{phase, portcullis_bin, wait_for, TestCluster};

#[test]
fn repeated_kills_lose_no_acknowledged_write() {
    let mut c = TestCluster::up(3);
    let ids = c.ids();
    wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let acked = acked.clone();
            let stop = stop.clone();
            let dir = c.path().to_path_buf();
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("c{w}x{i}");
                    i += 1;
                    let out = std::process::Command::new(portcullis_bin())
                        .arg("--cluster")
                        .arg(&dir)
                        .args(["app", "create", &name, "--port", "80"])
                        .output()
                        .expect("run cli");
                    if out.status.success() {
                        acked.lock().expect("lock").insert(name);
                    }
                }
            })
        })
        .collect();

    // Alternate: a follower, then the leader, then a follower, then the leader.
    for round in 0..4 {
        let leader = wait_for("a leader", Duration::from_secs(15), || {
            c.agreed_leader(&ids)
        });
        let victim = if round % 2 == 0 {
            *ids.iter().find(|i| **i != leader).expect("follower")
        } else {
            leader
        };
        let before = acked.lock().expect("lock").len();
        wait_for(
            "writes progress before the kill",
            Duration::from_secs(20),
            || (acked.lock().ok()?.len() >= before + 5).then_some(()),
        );
        phase(&format!(
            "round {round}: SIGKILL node {victim} ({})",
            if victim == leader {
                "leader"
            } else {
                "follower"
            }
        ));
        c.kill(victim);
        let n = acked.lock().expect("lock").len();
        wait_for(
            "writes progress with a node down",
            Duration::from_secs(20),
            || (acked.lock().ok()?.len() >= n + 5).then_some(()),
        );
        c.start_node(victim);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }

    phase("every acknowledged write is on every node");
    let acked = acked.lock().expect("lock").clone();
    c.assert_apps_on_every_node(&acked);
    eprintln!(
        "{} acknowledged writes survived 4 kills on all nodes",
        acked.len()
    );
}
