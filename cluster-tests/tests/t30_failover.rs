//! t30: SIGKILL the leader during a stream of `app create` writes. A new leader accepts writes
//! within 5 s (local default timeouts), and after the old leader restarts no acknowledged write
//! is missing on any node.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_cluster_tests::harness::{phase, wait_for, TestCluster};

#[test]
fn leader_kill_then_recovery() {
    let mut c = TestCluster::up(3);
    let ids = c.ids();
    let leader = wait_for("a leader", Duration::from_secs(10), || {
        c.agreed_leader(&ids)
    });

    phase("start a writer that creates apps continuously and records acknowledgements");
    // (name, invoked at, acknowledged at)
    let acked: Arc<Mutex<Vec<(String, Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let cluster_dir = c.path().to_path_buf();
    let writer = {
        let acked = acked.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{i}");
                i += 1;
                let invoked = Instant::now();
                let out =
                    std::process::Command::new(portcullis_cluster_tests::harness::portcullis_bin())
                        .arg("--cluster")
                        .arg(&cluster_dir)
                        .args(["app", "create", &name, "--port", "80"])
                        .output()
                        .expect("run cli");
                if out.status.success() {
                    acked
                        .lock()
                        .expect("lock")
                        .push((name, invoked, Instant::now()));
                }
            }
        })
    };
    wait_for("some writes acknowledged", Duration::from_secs(20), || {
        (acked.lock().ok()?.len() >= 10).then_some(())
    });

    phase(&format!("SIGKILL the leader (node {leader})"));
    c.kill(leader);
    let killed_at = Instant::now();
    let survivors: Vec<u64> = ids.iter().copied().filter(|i| *i != leader).collect();

    phase("a new leader accepts writes");
    // Only a write invoked after the kill proves the new leader: one already in flight may have
    // been committed by the old leader just before it died.
    let first_after = wait_for(
        "a write invoked after the kill to be acknowledged",
        Duration::from_secs(15),
        || {
            acked
                .lock()
                .ok()?
                .iter()
                .find(|(_, invoked, _)| *invoked > killed_at)
                .map(|(_, _, done)| *done)
        },
    );
    let gap = first_after - killed_at;
    eprintln!(
        "first write invoked after the kill was acknowledged {gap:?} after the leader was killed"
    );
    assert!(
        gap < Duration::from_secs(5),
        "writes resumed only after {gap:?}"
    );
    let new_leader = wait_for(
        "survivors agree on a leader",
        Duration::from_secs(10),
        || c.agreed_leader(&survivors).filter(|l| *l != leader),
    );
    assert_ne!(new_leader, leader);

    phase("restart the old leader, then stop the writer");
    c.start_node(leader);
    let n = acked.lock().expect("lock").len();
    wait_for(
        "writes continue after the restart",
        Duration::from_secs(20),
        || (acked.lock().ok()?.len() > n + 5).then_some(()),
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");

    phase("every acknowledged write is on every node");
    let acked: BTreeSet<String> = acked
        .lock()
        .expect("lock")
        .iter()
        .map(|(n, _, _)| n.clone())
        .collect();
    c.assert_apps_on_every_node(&acked);
    eprintln!(
        "{} acknowledged writes present on all {} nodes",
        acked.len(),
        ids.len()
    );
}
